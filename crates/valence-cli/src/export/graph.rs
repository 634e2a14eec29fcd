//! A small builder of ONNX graphs: named values, constant tensors and nodes, written as an
//! ONNX `ModelProto` (opset 17, IR version 8, which ONNX Runtime 1.13 and later and Triton's
//! ONNX Runtime backend read).

use prost::Message;

use super::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};

pub const OPSET: i64 = 17;
const IR_VERSION: i64 = 8;

/// An attribute value of a node.
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Str(&'static str),
}

/// A graph's dimension: fixed, or named and dynamic.
pub enum Dim {
    Fixed(i64),
    Named(&'static str),
}

#[derive(Default)]
pub struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    next_id: usize,
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                Dim::Named(n) => tensor_shape_proto::dimension::Value::DimParam(n.to_string()),
            }),
            denotation: String::new(),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

impl GraphBuilder {
    fn fresh(&mut self, hint: &str) -> String {
        self.next_id += 1;
        format!("{hint}_{}", self.next_id)
    }

    pub fn input(&mut self, name: &str, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, DataType::Float, dims));
        name.into()
    }

    /// Names `value` as a graph output (through an Identity node, so any value can be one).
    pub fn output(&mut self, value: &str, name: &str, dims: &[Dim]) {
        self.node_named("Identity", &[value], vec![], name);
        self.outputs.push(value_info(name, DataType::Float, dims));
    }

    /// A float constant of shape `dims` (row-major `data`).
    pub fn f32s(&mut self, hint: &str, dims: &[usize], data: Vec<f32>) -> String {
        assert_eq!(dims.iter().product::<usize>(), data.len(), "{hint}");
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    pub fn scalar(&mut self, v: f32) -> String {
        self.f32s("c", &[], vec![v])
    }

    pub fn f64_scalar(&mut self, v: f64) -> String {
        let name = self.fresh("c");
        self.initializers.push(TensorProto {
            name: name.clone(),
            data_type: DataType::Double as i32,
            raw_data: v.to_le_bytes().to_vec(),
            ..Default::default()
        });
        name
    }

    /// A 1-D int64 constant (shapes, axes, indices).
    pub fn i64s(&mut self, data: &[i64]) -> String {
        let name = self.fresh("i");
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: vec![data.len() as i64],
            data_type: DataType::Int64 as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    /// A 0-D int64 constant.
    pub fn i64_scalar(&mut self, v: i64) -> String {
        let name = self.fresh("i");
        self.initializers.push(TensorProto {
            name: name.clone(),
            data_type: DataType::Int64 as i32,
            raw_data: v.to_le_bytes().to_vec(),
            ..Default::default()
        });
        name
    }

    fn node_named(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>, out: &str) {
        let attribute = attrs
            .into_iter()
            .map(|(name, a)| {
                let mut p = AttributeProto {
                    name: name.into(),
                    ..Default::default()
                };
                match a {
                    Attr::Int(v) => {
                        p.r#type = AttributeType::Int as i32;
                        p.i = v;
                    }
                    Attr::Float(v) => {
                        p.r#type = AttributeType::Float as i32;
                        p.f = v;
                    }
                    Attr::Ints(v) => {
                        p.r#type = AttributeType::Ints as i32;
                        p.ints = v;
                    }
                    Attr::Str(v) => {
                        p.r#type = AttributeType::String as i32;
                        p.s = v.as_bytes().to_vec();
                    }
                }
                p
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            name: format!("{op}_{}", self.nodes.len()),
            op_type: op.into(),
            attribute,
            ..Default::default()
        });
    }

    /// One node with one output; returns the output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(&op.to_ascii_lowercase());
        self.node_named(op, inputs, attrs, &out);
        out
    }

    pub fn op2(&mut self, op: &str, a: &str, b: &str) -> String {
        self.op(op, &[a, b], vec![])
    }

    /// The serialized model.
    pub fn finish(self, name: &str, metadata: &[(&str, String)]) -> Vec<u8> {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "valence export".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: name.into(),
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: k.to_string(),
                    value: v.clone(),
                })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec()
    }
}
